"""callbridge: a phone line that speaks with one cloned voice (Twilio Media Streams + Dia2)."""
