"""Carriers: each subpackage speaks one carrier's wire protocol and implements the call core's leg
interface (:mod:`callbridge.calls.leg`), so carriers depend on the call core, never the reverse."""
