"""The ``tme-atlas`` command: wires the offline build (:mod:`preprocessing`, :mod:`atlas`)
and the web explorer (:mod:`app`).

This is the only package that imports both sides: ``preprocessing`` and ``atlas`` never
import web code (Dash/Flask/``app``), and ``app`` never imports ``preprocessing``
(tests/test_structure.py). ``python -m tme_atlas`` is the same as the ``tme-atlas`` script.
"""
