"""The websocket side: authentication, the endpoint, and turning JSON into typed messages."""
