"""The dashboard, the HTTP API and the metrics of a running CEM (`[http]` in the site config)."""
