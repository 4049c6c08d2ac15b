"""TokenScope: explore token merging and pruning in Vision Transformers.

Run with ``streamlit run app.py``. This file only sets up the pages; each page lays out
its inputs and views, computation lives in ``analysis/`` and drawing in ``viz/``.
``streamlit run app.py -- --allow-folder PATH`` lets users read files in PATH on the server
(checkpoints, image folders); without it they upload files (see README, "Serving the app").
"""

import os
import sys

# Idle OpenMP threads sleep instead of spinning. On a busy CPU, spinning threads made a
# 2-thread forward pass of the default model ~6x slower (1.5 s against 0.25 s). Set here,
# before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st

from analysis.access import allow_from_args
from app_pages.media import keep_media_files
from viz.icon import app_icon

allow_from_args(sys.argv[1:])
keep_media_files()  # pictures survive other sessions' cleanups (no broken images)
st.set_page_config(page_title="TokenScope", page_icon=app_icon(), layout="wide")

pages = [
    st.Page("app_pages/explore.py", title="Explore", icon=":material/layers:", default=True),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("app_pages/tradeoff.py", title="Trade-off", icon=":material/show_chart:"),
    st.Page("app_pages/figures.py", title="Figures", icon=":material/image:"),
]
st.navigation(pages).run()
