"""TokenScope: explore token merging and pruning in Vision Transformers (placeholder page)."""

import streamlit as st

st.set_page_config(page_title="TokenScope", layout="wide")
st.title("TokenScope")
st.write("The Explore page is coming. Meanwhile use the analysis core: `python -m analysis --help`.")
