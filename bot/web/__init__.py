"""The web surface: the ASGI app (Slack over HTTP, /healthz) and the Alertmanager and Stripe
webhooks."""
