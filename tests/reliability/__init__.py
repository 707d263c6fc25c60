"""Reliability and security suite: crashes, outages, races, corruption, bad input, soak.

Every scenario is bounded in count and time. ``PIECESTORE_SOAK=1`` scales the scenarios up
and runs the tests marked ``slow``.
"""
