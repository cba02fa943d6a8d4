"""The release and operations sections of params.yaml: the registry, serving (the plane and
the gateway), KServe rendering, the canary's policy, notifications and Prefect deployments.
No stage reads these: DVC does not rebuild a model when only they change."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from pipelines.section import Section


class RegistryParams(Section):
    model_name: str = Field("reverse-digits", description="MLflow registered model name.")
    experiment: str = Field("llm-lifecycle", description="MLflow experiment for the flow's runs.")
    keep_trainable: bool = Field(True, description="Also log the candidate step's unquantized weights (artifact trainable/, tag `trainable`) with each version when the served model is quantized, so a later run can train from it (model.start_from: champion). Costs one more full-precision copy per version (the quantized one is kept either way); false for huge models, which then cannot be a starting point.")


class ServeParams(Section):
    engine: Literal["cpu", "vllm", "tensorrt-llm"] = Field("cpu", description="Serving engine; cpu runs transformers in-process.")
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=1, le=65535, description="Port for `make serve` (the champion).")
    startup_timeout_s: float = Field(120, gt=0, description="How long to wait for /health after launch.")
    max_new_tokens: int = Field(64, ge=1, description="Upper bound on max_tokens per request.")
    cpu_threads: int = Field(0, ge=0, description="torch threads per CPU-engine server; 0 = this machine's cores divided by the servers running side by side (a canary runs two: oversubscribed cores cost ~8x throughput).")
    cache_entries: int = Field(1024, ge=0, description="Answers to deterministic requests (temperature 0 or a fixed seed; not streams) the gateway's in-memory cache keeps, keyed by model version (0 = no cache; with redis_url, Redis holds them within its maxmemory).")
    cache_ttl_s: float = Field(300, gt=0, description="How long a cached answer is served before the backend is asked again.")
    queue_capacity: int = Field(32, ge=1, description="Requests the gateway forwards at once per engine replica; the rest wait in its priority queue, higher tiers first. Twice the CPU engine's batch size (16): the engine then has its next batch queued while it generates one (at 16 the plane bench lost 38 % of the engine's throughput, at 64 20 %); higher only moves the queue into the engines, where priority is not seen.")
    queue_max_waiting: int = Field(128, ge=0, description="Requests that may wait in the gateway's queue; beyond it a request gets 429 with Retry-After at once.")
    queue_max_overtake_s: float = Field(10, gt=0, description="How long a waiting request may be overtaken by higher-priority requests that arrived after it; past it, it is served before any of those (the oldest first), so a lower tier is answered even while a higher one keeps every slot busy (strict priority starved it until its client timed out). Requests admitted that way are counted in gateway_queue{state=\"admitted_by_age\"}: a rising count says the slots are too few for the higher tiers.")
    keys_file: str | None = Field(None, description="YAML file of API keys (stored hashed, each with a tier {priority, rpm, tpm}, scopes and an optional expiry), written by `lifecycle keys` (serving/keys.py); gateways re-read it when it changes. Keep it out of git. null = no per-key tiers, scopes or rate limits.")
    redis_url: str | None = Field(None, description="redis://host:port/db shared by gateway replicas for the response cache and the rate limits; null = each gateway keeps its own in memory.")
    redis_failure_mode: Literal["open", "closed"] = Field("open", description="What keyed requests get while Redis (redis_url) cannot be reached: 'open' serves them without their rate limits (logged, counted in gateway_rate_limits_unavailable_total); 'closed' refuses them with 503 and Retry-After, in OpenAI's error shape. The response cache fails open either way (a miss).")
    replicas: int = Field(1, ge=1, description="Engine processes per version in the serving plane (`make serve`), balanced by fewest requests outstanding.")
    plane_url: str | None = Field("auto", description="The running plane releases go into: 'auto' = http://host:port when a plane answers there for this registry; a URL; null = never look for one. Without a running plane a release starts a temporary plane of its own (a free loopback port, its own state folder) and stops it afterwards.")
    drain_timeout_s: float = Field(60, gt=0, description="How long a version leaving the plane (promoted away, rolled back) may finish its requests in flight before it is stopped.")
    supervise_interval_s: float = Field(0.5, gt=0, description="How often the plane's supervisor checks each engine process (exited, or failing /health 3 times in a row: restarted).")
    target: Literal["local", "kserve"] = Field("local", description="Where a release goes: 'local' serves and judges it on this machine (in the running plane, or a temporary one); 'kserve' renders a KServe InferenceService per canary step into kserve.out_dir for a cluster to apply (serving/kserve.py) and serves nothing here.")
    tls_certfile: str | None = Field(None, description="PEM certificate (chain) the plane serves HTTPS with, beside tls_keyfile (serving/tls.py). A bind off loopback needs TLS: this, or tls_offloaded. null = plain HTTP.")
    tls_keyfile: str | None = Field(None, description="The PEM private key of tls_certfile. Keep it out of git.")
    tls_ca_file: str | None = Field(None, description="What this project's own clients of the plane (a release, make rollback, the alert receiver) verify its certificate with; null = tls_certfile itself (a self-signed certificate). The certificate must name the address they use (plane_url, or 127.0.0.1 for 'auto').")
    tls_offloaded: bool = Field(False, description="TLS is terminated in front of the plane (an ingress, a load balancer, a TLS proxy): a bind off loopback is then allowed without tls_certfile. Keys cross the hop between that proxy and the plane in the clear.")

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServeParams":
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            have, missing = ("tls_certfile", "tls_keyfile") if self.tls_certfile else ("tls_keyfile", "tls_certfile")
            raise ValueError(f"serve.{have} is set but serve.{missing} is not: TLS needs the certificate and its private key")
        return self


class RecordParams(Section):
    """The record of every answer the gateway gives (serving/record/): PII-redacted prompts and
    answers with their version, key tier, tokens and latency, written off the request path.
    `lifecycle traffic` reads and exports it; `lifecycle forget KEY` deletes a key's rows."""

    enabled: bool = Field(True, description="Record every completion the plane's gateway answers (chat and text, streamed or not, cache hits included).")
    store: str | None = Field(None, description="Where: a SQLite file path, or postgresql://user@host:port/db. null: record.sqlite3 in the plane's state folder (.serving/plane/ for `make serve`; a release's temporary plane keeps its own).")
    store_env: str = Field("LIFECYCLE_RECORD_URL", description="Environment variable holding the store's URL; it wins over `store` when set (a database password stays out of git).")
    retention_days: float = Field(30, gt=0, description="Rows older than this are purged (every purge_interval_s while the gateway runs).")
    purge_interval_s: float = Field(3600, gt=0, description="How often the gateway purges rows past retention_days (also once at start).")
    opt_out_keys: list[str] = Field(default_factory=list, description="Key ids whose completions are not recorded (they still get an id): 16 hex digits, a digest of the key, which `lifecycle traffic --key KEY` prints. Never the key itself: params.yaml is committed.")
    opt_out_tiers: list[str] = Field(default_factory=list, description="Tiers (serve.keys_file) whose completions are not recorded; 'untiered' is the gateway's own key or no key, 'service' the plane's own traffic (a release's synthetic users).")
    buffer_rows: int = Field(10_000, ge=1, description="Completions the buffer between the requests and the store holds; when full, further rows are dropped (gateway_record_dropped_total), never requests.")
    batch_rows: int = Field(1024, ge=1, description="Most rows written to the store in one transaction.")
    flush_interval_s: float = Field(2.0, gt=0, description="Longest a row waits in the buffer for its batch to fill; not waited out when someone waits for the row (a feedback on it, the gateway's shutdown). Each batch costs the redactor a fixed share (its caches cold after the engines ran, the store's commit), so a few large batches cost less CPU than many small ones.")
    redactor_idle: bool = Field(True, description="Run the record's redactor process (parsing, redaction, the store's inserts) on idle CPU only (Linux's SCHED_IDLE): it never takes a core from the gateway or an engine, which preempt it the moment they wake. When it has not answered a batch within redactor_idle_patience_s, or by the time the buffer is half full (a machine with no idle core), it is killed and the batch goes to a second redactor at redactor_nice, which takes the batches for the next 10 s; nothing is lost or stored twice (the store ignores a row it already has). Measured (600 paired rounds, 32 clients, 2 cores, 2 s batches): engine-answered requests +0.9 % throughput (95 % interval +0.25 to +1.6 %) and +1.1 % p50 (+0.6 to +1.6 %). On that machine the CPU it spends, idle or not, still costs serving about one for one (ARCHITECTURE.md, the record); it is the default because it never takes a core serving wants. false, or an OS without the policy (macOS): the niced redactor only.")
    redactor_idle_patience_s: float = Field(1.0, gt=0, description="How long the idle redactor may take over a batch before the niced one takes it instead (see redactor_idle). A batch is a few ms of CPU: one that takes longer means the machine has no idle core.")
    redactor_nice: int = Field(10, ge=0, le=19, description="Scheduling niceness of the niced redactor process (see redactor_idle: the only one when redactor_idle is false, else the one that takes the batches the idle one was too late for): on a busy machine it yields the CPU to the gateway and the engines and catches up when they leave some; the buffer absorbs the lag (buffer_rows; full: rows dropped and counted, never requests). Measured (benchmarks/record.py, 32 clients, 2 cores, redactor_idle false): at 10, 60 paired rounds put the record's cost on engine-answered requests at +2.5 % throughput (95 % interval +0.7 to +4.4 %) and +2.0 % p50 (+0.8 to +3.3 %), nothing dropped; niced or not, an engine computing on both cores loses time whenever the redactor takes one (ARCHITECTURE.md, the record). 0: the gateway's own priority.")

    @field_validator("opt_out_keys")
    @classmethod
    def _key_ids(cls, ids: list[str]) -> list[str]:
        for i, value in enumerate(ids):
            if not re.fullmatch(r"[0-9a-f]{16}", value):
                raise ValueError(
                    f"opt_out_keys[{i}] is not a key id (16 hex digits): never write a key in params.yaml; "
                    "`lifecycle traffic --key KEY` prints the id of a key"
                )
        return ids

    def store_url(self) -> str | None:
        """The store to use: $store_env when set, else `store` (None: the plane's default file)."""
        return os.environ.get(self.store_env) or self.store


class FeedbackParams(Section):
    """POST /v1/feedback on the gateway (serving/feedback.py): what users say about an answer, by
    its completion id, stored PII-redacted beside the record (serving/record/feedback.py). Needs
    record.enabled: feedback is only taken on recorded completions."""

    enabled: bool = Field(True, description="Answer POST /v1/feedback on the plane's gateway (404 `feedback_unavailable` when off, or when record.enabled is false).")
    rating_scale: Literal["thumbs", "stars"] = Field("thumbs", description="What `rating` takes: 'thumbs' is +1 or -1, 'stars' an integer 1 to 5. Each stored rating keeps the scale it was given in.")
    max_age_days: float = Field(7, gt=0, description="Feedback on a completion older than this is refused (404 `completion_expired`): the answer is no longer what the user saw in context. Keep it below record.retention_days.")
    max_body_bytes: int = Field(65_536, ge=256, description="Largest feedback body accepted; larger ones get 413 `request_too_large` and store nothing (a correction is one answer, not a document).")
    wait_for_record_s: float = Field(5, ge=0, description="How long a feedback waits for its completion's row when that row is still in the recorder's buffer (a client can rate faster than the writer's next batch); past it, 503 with Retry-After.")
    max_tags: int = Field(16, ge=0, description="Most `tags` one feedback carries (each at most 64 characters).")


class ReviewParams(Section):
    """The review flow (flows/review.py): a batch of unreviewed explicit feedback shown in the
    Prefect UI, paused until a person accepts, edits or rejects it (per item or in bulk)."""

    batch_size: int = Field(20, ge=1, description="Feedback items per review: the oldest unreviewed first.")
    auto_accept_ratings: bool = Field(False, description="Accept feedback that is only a rating (no correction, no preferred answer) without a person: recorded as decided by 'auto (review.auto_accept_ratings)'. Corrections and preferences are always reviewed.")
    timeout_s: int = Field(86_400, ge=1, description="How long a review waits for its decision in the Prefect UI before its flow run fails; its items stay unreviewed for the next run.")
    poll_interval_s: int = Field(10, ge=1, description="How often the paused flow run checks whether it was resumed.")


class KServeParams(Section):
    """Serving on a cluster (serve.target: kserve): the InferenceService the release renders for
    each canary step, with KServe's Hugging Face runtime and its vLLM backend (serving/kserve.py).
    Rendered and validated here, never applied: `kubectl apply -f` does that on the cluster."""

    name: str | None = Field(None, description="InferenceService name (a DNS label); null: registry.model_name.")
    namespace: str = Field("default", description="Kubernetes namespace of the InferenceService.")
    runtime: str | None = Field(None, description="ServingRuntime or ClusterServingRuntime to use; null: KServe picks its Hugging Face runtime for modelFormat huggingface (vLLM backend).")
    storage_uri: str | None = Field(None, description="Where a version's model folder lives for the cluster, with {name} and {version}, e.g. s3://models/{name}/v{version}; null: the version's MLflow artifact location, which must then be object storage (s3://, gs://, ...).")
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu per replica (requests = limits); more than 1 also sets vLLM's --tensor-parallel-size. 0: no GPU requested.")
    cpu: str = Field("4", description="CPU per replica (Kubernetes quantity; requests = limits).")
    memory: str = Field("32Gi", description="Memory per replica (Kubernetes quantity; requests = limits).")
    min_replicas: int = Field(1, ge=0, description="Fewest predictor replicas (0 lets Knative scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most predictor replicas.")
    api_key_secret: str = Field("llm-serving-api-key", description="Kubernetes Secret holding the key clients must send (read as $VLLM_API_KEY); the key itself never appears in a manifest.")
    api_key_secret_key: str = Field("api-key", description="The key inside api_key_secret that holds the API key.")
    service_account: str | None = Field(None, description="Service account whose secret gives the storage initializer access to storage_uri (KServe's S3/GCS credentials); null: the namespace default.")
    deployment_mode: Literal["Serverless", "Knative"] = Field("Serverless", description="serving.kserve.io/deploymentMode: canaryTrafficPercent only splits traffic in Knative mode ('Serverless'; KServe >= 0.16 also calls it 'Knative').")
    extra_args: list[str] = Field(default_factory=list, description="More runtime arguments, verbatim (e.g. --max-model-len=4096).")
    out_dir: str = Field("deploy/kserve", description="Where the release writes the manifests: <out_dir>/v<N>/step-<w>.yaml, promote.yaml, rollback.yaml.")

    @model_validator(mode="after")
    def _replicas(self) -> "KServeParams":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class CanaryParams(Section):
    """Progressive delivery with the semantics of Argo Rollouts / Flagger: traffic weight steps,
    a minimum amount of evidence per step, metric checks, and a failure limit.

    The canary's error rate is judged by a sequential test against stable's own rate in the
    same step (`serving.analysis.ErrorRateTest`, Wald's SPRT): H0 "canary <= stable +
    error_rate_margin" against H1 "canary >= stable + error_rate_effect", with error
    probabilities error_rate_alpha and error_rate_beta. How many requests that takes follows
    from the effect, so `step_requests` is a floor raised to `min_step_requests`."""

    strategy: Literal["canary", "blue_green", "shadow"] = Field("canary", description="canary: weighted steps on live traffic; blue_green: the candidate is analysed on mirrored traffic (step_requests copies; errors and latency judged, agreement with stable's answers reported), then all traffic switches at once; shadow: mirrored and reported, never promoted.")
    steps: list[int] = Field(default_factory=lambda: [10, 25, 50, 100], description="Canary traffic weight (percent) at each step; the last should be 100.")
    step_requests: int = Field(20, ge=1, description="Fewest requests the canary must answer at each step before it is analysed; raised to min_step_requests, the fewest at which the error-rate test can pass a step.")
    interval_s: float = Field(0.0, ge=0, description="Shortest time spent at each step (real traffic needs minutes; the embedded demo drives its own).")
    golden_prompts: int = Field(20, ge=1, description="Held-out prompts sent straight to the canary; their exact match is checked.")
    shadow_prompts: int = Field(10, ge=0, description="Golden prompts sent to both stable and canary straight (not through the gateway); their agreement is reported, never held against the canary: a better candidate answers differently. Correctness decides: golden exact match against min_exact_match and, prompt by prompt, against stable's (champion_tolerance). 0 = off.")
    min_exact_match: float = Field(0.8, ge=0, le=1, description="Canary's golden-prompt exact match must reach this.")
    champion_tolerance: float = Field(0.05, ge=0, le=1, description="Canary's golden exact match may trail stable's by at most this: on the golden prompts where one is right and the other wrong, (stable's - the canary's) / prompts <= this.")
    max_error_rate: float = Field(0.0, ge=0, le=1, description="Error rate (5xx, refused, timeout) a release is held to when stable served nothing to compare with: the largest share a first release may fail, and stable's rate in the error-rate test at a step where stable got no traffic (the 100% step).")
    error_rate_margin: float = Field(0.001, ge=0, lt=1, description="Error-rate test, H0: the canary's error rate is at most stable's plus this (absolute). 0 says a canary may not fail more often than stable at all: against a stable without failures its first failure then fails the step.")
    error_rate_effect: float = Field(0.01, gt=0, lt=1, description="Error-rate test, H1: the canary's error rate is at least stable's plus this (absolute): the smallest degradation a step must catch, with probability 1 - error_rate_beta.")
    error_rate_alpha: float = Field(0.05, gt=0, lt=1, description="Largest probability that the error-rate test fails a step whose canary is within error_rate_margin of stable (a false rollback).")
    error_rate_beta: float = Field(0.1, gt=0, lt=1, description="Largest probability that the error-rate test passes a step whose canary is worse than stable by error_rate_effect (a missed regression).")
    max_latency_ratio: float = Field(2.5, gt=0, description="Canary p95 latency may be at most this multiple of stable's in the same step.")
    max_ttft_ratio: float = Field(3.0, gt=0, description="Canary's p95 time to first token, as its engine reports it (scraped from the engine's Prometheus endpoint: cpu, vLLM or TensorRT-LLM), may be at most this multiple of stable's in the same step.")
    ttft_floor_s: float = Field(0.05, ge=0, description="Times to first token below this count as this in the ratio above: differences under it do not matter to users, and engine histograms cannot resolve them.")
    failure_limit: int = Field(0, ge=0, description="Failed analyses tolerated before rolling back (0: the first failure rolls back).")

    @model_validator(mode="after")
    def _steps(self) -> "CanaryParams":
        if not self.steps or any(not 0 < w <= 100 for w in self.steps) or self.steps != sorted(self.steps):
            raise ValueError(f"steps must be increasing percentages in (0, 100], got {self.steps}")
        return self

    @model_validator(mode="after")
    def _error_rate_test(self) -> "CanaryParams":
        if self.error_rate_effect <= self.error_rate_margin:
            raise ValueError(f"error_rate_effect ({self.error_rate_effect}) must exceed error_rate_margin ({self.error_rate_margin}): the test tells the two apart")
        # A step analysed earlier could never pass: raise the floor rather than fail every step.
        # (The model is frozen; this is its own validation, so it sets the field directly.)
        object.__setattr__(self, "step_requests", max(self.step_requests, self.min_step_requests))
        return self

    @property
    def min_step_requests(self) -> int:
        """The fewest canary requests at which the error-rate test can pass a step: every answer
        without a failure lowers the log-likelihood ratio by ln((1 - margin) / (1 - effect)), and
        H0 is accepted at ln(beta), so a spotless canary against a spotless stable needs
        ceil(ln(1 / beta) / ln((1 - margin) / (1 - effect))). The same bound as
        serving.analysis.ErrorRateTest.floor at stable's rate 0 (the largest: a stable that
        fails too lowers it)."""
        import math

        per_answer = math.log((1 - self.error_rate_margin) / (1 - self.error_rate_effect))
        return math.ceil(math.log(1 / self.error_rate_beta) / per_answer)


class NotifyParams(Section):
    """Who hears about releases: a JSON POST to a webhook (Slack/Teams/Mattermost incoming
    webhooks read its `text`) on gate failure, rollback and promotion (tasks/notify.py)."""

    webhook_url: str | None = Field(None, description="URL the notifications are POSTed to; null = none (a URL with a secret in it belongs in webhook_url_env's variable, not here).")
    webhook_url_env: str = Field("LIFECYCLE_WEBHOOK_URL", description="Environment variable holding the webhook URL; it wins over webhook_url when set.")
    events: list[Literal["gate_failed", "rolled_back", "promoted", "shadowed", "quality_dropped", "drift_detected", "alert"]] = Field(
        default_factory=lambda: ["gate_failed", "rolled_back", "promoted", "quality_dropped", "drift_detected", "alert"],
        description="Which outcomes are sent: a release's (gate_failed, rolled_back, promoted, shadowed) and the alerts' (serving/alerts.py: rolled_back when an alert rolls a canary back, quality_dropped, drift_detected, and alert for any other firing alert).",
    )
    timeout_s: float = Field(5, gt=0, description="Per attempt; a webhook that does not answer never fails or holds up the run (three attempts, then a warning).")


class OrchestrationParams(Section):
    """How the Prefect deployments run the flows (`make serve-flows`, flows/deployments.py)."""

    cron: str = Field("0 3 * * *", description="When the scheduled lifecycle run starts (cron syntax, in `timezone`); nightly at 03:00 by default.")
    timezone: str = Field("UTC", description="Time zone the cron is read in (an IANA name, e.g. Europe/Berlin).")
    concurrency_limit: int = Field(1, ge=1, description="Lifecycle and release runs of this project (model name and folder) that may run at once, on one Prefect server: they share the DVC workspace and the registry's aliases.")
    on_busy: Literal["wait", "drop"] = Field("wait", description="A run started while the limit is taken: 'wait' queues it (AwaitingConcurrencySlot) until a slot frees; 'drop' cancels it at once, its state message saying which run is busy.")


# A Prometheus duration: 30s, 5m, 1h30m, 3d.
Duration = Annotated[str, StringConstraints(pattern=r"^([0-9]+(ms|s|m|h|d|w|y))+$")]


class BurnWindow(Section):
    """One window pair of a multi-window, multi-burn-rate alert (Google SRE workbook, ch. 5): it
    fires while the budget burns faster than `burn_rate` over both the long window and the short
    one (the short one makes it stop soon after the burn does)."""

    long: Duration = Field(description="Long window, e.g. 1h.")
    short: Duration = Field(description="Short window, e.g. 5m (the workbook uses long / 12).")
    burn_rate: float = Field(gt=0, description="Budget consumption rate that fires: 1 spends the budget exactly over the SLO period; 14.4 over 1h spends 2 % of a 30-day budget.")
    severity: Literal["page", "ticket"] = Field(description="The alert's severity label; Alertmanager groups by it, the receiver acts on either.")


def workbook_windows() -> list[BurnWindow]:
    return [
        BurnWindow(long="1h", short="5m", burn_rate=14.4, severity="page"),
        BurnWindow(long="6h", short="30m", burn_rate=6, severity="page"),
        BurnWindow(long="1d", short="2h", burn_rate=3, severity="ticket"),
        BurnWindow(long="3d", short="6h", burn_rate=1, severity="ticket"),
    ]


class MonitorParams(Section):
    """Watching the plane serve (`make monitor`, monitoring/): Prometheus scrapes the gateway and
    every engine, its rules (rendered from this section by monitoring/render.py) record the
    service levels and alert on them, Alertmanager routes the alerts to the receiver
    (serving/alerts.py), which acts. Everything listens on loopback and keeps its data under
    .serving/monitoring/."""

    prometheus_port: int = Field(9090, ge=1, le=65535, description="Prometheus' port (loopback).")
    alertmanager_port: int = Field(9093, ge=1, le=65535, description="Alertmanager's port (loopback; its cluster gossip is off).")
    receiver_port: int = Field(9097, ge=1, le=65535, description="The receiver's port (loopback): Alertmanager's webhook, and /metrics with the scheduled checks' gauges.")
    scrape_interval: Duration = Field("15s", description="How often Prometheus scrapes the gateway, the engines and the checks' exporter.")
    evaluation_interval: Duration = Field("15s", description="How often the recording and alert rules are evaluated.")
    retention: Duration = Field("15d", description="How long Prometheus keeps samples (at least the longest burn window).")
    slo_error_ratio: float = Field(0.01, gt=0, lt=1, description="SLO: the largest share of a version's requests that may fail (5xx, 429, timeouts, dropped connections, a canary's 4xx stable answers): the error budget the burn-rate alerts measure.")
    slo_p95_latency_s: float = Field(2.5, gt=0, description="SLO: 95 % of a version's successful answers (a stream to its end) come within this, as the gateway times them; 5 % is the budget. Must be a bucket bound of gateway_backend_latency_seconds (serving/routing.py LATENCY_BUCKETS).")
    slo_p95_ttft_s: float = Field(1.0, gt=0, description="SLO: 95 % of a version's generation requests get their first token within this, as its engines report it; 5 % is the budget. Must be a bucket bound of the engine's serving_time_to_first_token_seconds (serving/server_metrics.py).")
    burn_windows: list[BurnWindow] = Field(default_factory=workbook_windows, description="The burn-rate alerts' window pairs (SRE workbook: 1h/5m x14.4 and 6h/30m x6 page, 1d/2h x3 and 3d/6h x1 ticket). One alert per SLO and severity, firing on any of its pairs.")
    engine_down_for: Duration = Field("1m", description="EngineDown / GatewayDown: a target unreachable this long (a supervisor restart takes seconds and moves the target).")
    queue_saturation: float = Field(0.9, gt=0, le=1, description="QueueSaturated: the gateway's waiting requests at this share of serve.queue_max_waiting...")
    queue_for: Duration = Field("2m", description="...for this long.")
    canary_window: Duration = Field("5m", description="CanaryWorseThanStable compares both versions over this window.")
    canary_error_ratio_margin: float = Field(0.02, ge=0, lt=1, description="CanaryWorseThanStable: the canary's error ratio exceeds stable's by more than this (absolute)...")
    canary_latency_ratio: float = Field(2.0, gt=1, description="...or its p95 latency is more than this multiple of stable's...")
    canary_for: Duration = Field("2m", description="...for this long.")
    quality_min: float = Field(0.7, ge=0, le=1, description="OnlineQualityDrop: lifecycle_online_quality_score (0..1, from the scheduled online-quality check) below this...")
    quality_for: Duration = Field("30m", description="...for this long: a sustained drop, not one bad sample.")
    drift_for: Duration = Field("1h", description="DriftDetected: lifecycle_drift_score above its lifecycle_drift_threshold for this long.")
    group_wait: Duration = Field("10s", description="Alertmanager: how long a new group of alerts waits for others before it is sent.")
    group_interval: Duration = Field("1m", description="Alertmanager: how long before a group's new alerts are sent.")
    repeat_interval: Duration = Field("4h", description="Alertmanager: how long before a still-firing alert is sent again.")
    cooldown_s: float = Field(900, ge=0, description="The receiver acts once per alert and subject (a version, a check) within this: a flapping alert rolls back, notifies or emits once; later firings are recorded as suppressed.")
    check_max_age_s: float = Field(172800, gt=0, description="A scheduled check's result (.serving/monitoring/checks/*.json) older than this is no longer exported: a check that stopped running must not hold an alert forever.")
    # The scheduled checks over the record of every answer (flows/watch.py).
    quality_cron: str | None = Field("*/30 * * * *", description="Schedule of the online-quality flow (a Prefect deployment, `make serve-flows`); null: no schedule.")
    quality_window: Duration = Field("1h", description="Online quality scores the answers recorded in this window before each run...")
    quality_sample_rate: float = Field(0.1, gt=0, le=1, description="...a seeded sample of this share of them per version (users' traffic only: the plane's own service tier, cache hits and failed answers are left out)...")
    quality_max_samples: int = Field(200, ge=1, description="...at most this many per version, each scored by evaluate.judge's endpoint (pointwise, `Score: N` of 10) and, when the recipe has a reward model, by it too.")
    quality_min_samples: int = Field(20, ge=1, description="A version with fewer scored answers in the window gets no score (too few to tell; the last score expires after check_max_age_s).")
    drift_cron: str | None = Field("0 * * * *", description="Schedule of the drift flow; null: no schedule.")
    drift_window: Duration = Field("1d", description="Drift compares the users' prompts of this window with the training prompts and with the window before it.")
    drift_min_prompts: int = Field(50, ge=10, description="A window with fewer prompts is not judged (reported as too small).")
    drift_reference_size: int = Field(1000, ge=10, description="At most this many prompts on each side (a seeded sample): the domain classifier's cost grows with them.")
    drift_alpha: float = Field(0.01, gt=0, lt=0.5, description="The chance that a window from the reference's own distribution raises any drift flag (Bonferroni over the four checks; pipelines/drift.py).")

    @model_validator(mode="after")
    def _windows(self) -> "MonitorParams":
        if not self.burn_windows:
            raise ValueError("burn_windows needs at least one window pair")
        for w in self.burn_windows:
            if seconds(w.short) >= seconds(w.long):
                raise ValueError(f"burn_windows: short window {w.short} must be shorter than long window {w.long}")
        if len({self.prometheus_port, self.alertmanager_port, self.receiver_port}) < 3:
            raise ValueError("prometheus_port, alertmanager_port and receiver_port must differ")
        return self


def seconds(duration: str) -> float:
    """A Prometheus duration in seconds (1h30m -> 5400)."""
    import re

    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * unit[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", duration))
