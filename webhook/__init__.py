"""Label Studio webhook receiver: the annotation that completes a round starts the next run.

Label Studio POSTs ANNOTATION_CREATED (or ANNOTATIONS_CREATED) here and waits for the answer
while it saves the annotation (its WEBHOOK_TIMEOUT is 1 s), so a request is only checked,
recorded and queued; one background thread asks Label Studio for the round's progress and,
once the target is met, starts the Prefect deployment.

- `auth`: who may deliver, with one shared secret (env XBL_WEBHOOK_SECRET), in one of two modes:
  * signed: X-Xbl-Timestamp (Unix seconds) and X-Xbl-Signature: sha256=<hex HMAC-SHA256 of
    "<timestamp>." + body under the secret>. Checked in constant time; a timestamp further
    than `webhook.signature_window_s` from the clock, or a signature already seen, is refused.
    It protects against a forged or altered body and against replays; the secret never
    travels. `auth.sign()` makes the headers.
  * static header (`webhook.auth: header`, the default): the secret itself in the
    X-XBL-Webhook-Secret header. Label Studio sends only fixed headers, so it cannot sign:
    this is its mode, and it keeps out only callers who do not know the secret. With
    `webhook.auth: signature` the header is refused.
- `delivery`: which annotations of which rounds a request reports.
- `store`: duplicates. Each (action, annotation id) is recorded in a SQLite file in the state
  dir, so a redelivery, or a restart, never counts twice; a (project, round) starts one run,
  also across restarts, unless that run ended FAILED or CRASHED: then the round's next
  delivery starts a new one. Records older than `webhook.retention_days` are deleted at start
  and hourly.
- `receiver`: checks, records and queues a request; its worker thread starts the runs.
- `server`: the HTTP endpoint. The secret is never accepted in the URL: /hooks/<anything> is
  refused (403), and request lines are logged with path tokens and query strings masked.
  The headers are authenticated before a byte of the body is read (401 for an unknown
  sender, 413 for a body over 10 MiB, "100 Continue" only once they pass); each request must
  arrive within REQUEST_TIMEOUT_S, and at most MAX_CONNECTIONS are handled at once (503 past
  that). SIGTERM stops it within STOP_REQUESTS_S + STOP_WORKER_S: a round whose check was
  cut short is checked at the next start.

    xbl webhook --host 127.0.0.1 --port 8787 --state-dir .xbl-webhook
    xbl webhook register --url http://127.0.0.1:8787/hooks [--project-id N]

Which run a round starts is the caller's `Starter` (the CLI starts a Prefect deployment), so
this package knows nothing of Prefect.
"""
