"""HTTP and WebSocket routes. Routes stay thin: validate, hand off, return."""
