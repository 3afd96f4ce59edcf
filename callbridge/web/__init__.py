"""The HTTP/WebSocket edge: the aiohttp app, Twilio's routes, the control API, the text and TTS sockets."""
