"""Streamlit dashboard: data.py loads runs (no Streamlit import), app.py draws them,
screenshot.py serves the app and photographs it with headless Chromium."""
