"""Pictures and charts of TokenScope runs: pure functions, testable without Streamlit.

``overlays`` turns an image and a trace into RGB arrays, ``charts`` makes plotly
figures, ``summary`` computes the numbers shown next to them, and ``schedule_table``
turns schedules into the per-layer editor's rows and back.
"""
