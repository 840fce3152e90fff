"""The API wing: the HTTP server, routes, tokens, the refusal throttle, the front page and the cleanup runner."""
