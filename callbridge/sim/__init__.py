"""The call simulator's pieces, one job per module; :mod:`callbridge.simulator` is its public face.

``config`` (what to simulate), ``wire`` (TwiML and the service's messages, checked as Twilio
does), ``report`` (what a call measured), ``queue`` (mu-law and Twilio's playback queue),
``caller`` (the caller's audio), ``rest`` (Twilio's REST hang-up on loopback), ``call`` (one
call's run, and many), ``cli`` (``callbridge simulate``). Import from ``callbridge.simulator``.
"""
