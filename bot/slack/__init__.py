"""The Bolt transport: the app, the work after an ack, the Slack client and listeners."""
