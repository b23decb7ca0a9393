"""The quantlab dashboard (Streamlit): ``quantlab ui`` serves ``app.py`` on a run store.

``app.py`` declares the pages (``views/*.py``, layout only); :mod:`.data` wraps the
run store and quantlab functions in Streamlit caches; :mod:`.charts` draws with one
colour per precision/calibrator; :mod:`.jobs` runs New run / demo jobs in a worker
process (:mod:`.pipeline`, :mod:`.spec`) that reports progress through the store.
"""
