"""TokenScope: explore token merging and pruning in Vision Transformers.

Run with ``streamlit run app.py``. This file only sets up the pages; each page lays out
its inputs and views, computation lives in ``analysis/`` and drawing in ``viz/``.
"""

import os

# Idle OpenMP threads sleep instead of spinning. On a busy CPU, spinning threads made a
# 2-thread forward pass of the default model ~6x slower (1.5 s against 0.25 s). Set here,
# before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st

st.set_page_config(page_title="TokenScope", page_icon=":material/grid_view:", layout="wide")

pages = [
    st.Page("app_pages/explore.py", title="Explore", icon=":material/layers:", default=True),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("app_pages/tradeoff.py", title="Trade-off", icon=":material/show_chart:"),
    # Figures joins here when it is built.
]
st.navigation(pages).run()
