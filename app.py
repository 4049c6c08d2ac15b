"""TokenScope: explore token merging and pruning in Vision Transformers.

Run with ``streamlit run app.py``. This file only sets up the pages; each page lays out
its inputs and views, computation lives in ``analysis/`` and drawing in ``viz/``.
"""

import streamlit as st

st.set_page_config(page_title="TokenScope", page_icon=":material/grid_view:", layout="wide")

pages = [
    st.Page("pages/explore.py", title="Explore", icon=":material/layers:", default=True),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
    # Trade-off and Figures join here as their pages are built.
]
st.navigation(pages).run()
