"""Serving: the OpenAI-compatible API server (`minimind serve`) and the Streamlit web chat (`minimind web`).

Both drive the Engine through one `Scheduler` thread (continuous batching across concurrent requests).
"""
