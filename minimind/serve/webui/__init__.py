"""The Streamlit page of `minimind web` (its own folder: Streamlit puts the page's folder on sys.path)."""
