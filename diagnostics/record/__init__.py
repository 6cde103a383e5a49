"""Instrumentation: the recorder, the quantities it computes, and the Recording file."""
