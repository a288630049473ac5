"""The radiologists' worklist in the browser (``ctscreen serve``; see docs/web.md).

``app.create_app(config)`` builds the FastAPI application: server-rendered pages over the
worklist database (read only), with users, sessions, reviews and an audit log in a database
of its own (``db.py``).  ``viewer.py`` stores and renders the per-study views (slices, labels,
key images) that the study page shows.  Needs the ``web`` extra (FastAPI, Jinja2, argon2).
"""
