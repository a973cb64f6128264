"""Durable asynchronous batch jobs: the SQLite store, the runner feeding items into the router's
own request path at batch priority, and the thin BatchService servicer."""
