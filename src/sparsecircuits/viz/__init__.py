"""Viewing circuits: cached analysis, graph figures, HTML export and the Streamlit app."""
