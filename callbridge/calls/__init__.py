"""The carrier-neutral call: lifecycle, turn queue, playout with pacing and marks, barge-in, agent hook."""
