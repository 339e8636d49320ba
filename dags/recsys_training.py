"""
### recsys_training — train the two-stage recommender from raw events

Daily. A run looks at all events up to its `as_of` and writes everything under
`$RECSYS_HOME/runs/<run>/<task>/` (see each task's doc and the run's `manifest.json`).

- `ingest`: reads the data source (`synthetic`, `movielens:PATH` or a contract directory) into the
  canonical tables -> `ingest/*.parquet`.
- `validate`: Great Expectations suites from `expectations/`; bad rows quarantined with all their
  reasons; fails at once (no retry) below `quality_threshold` -> `validate/accepted/`,
  `validate/quarantine/`, `validate/report.json`, `validate/data_docs/index.html` (results page; GX's docs in
  `validate/data_docs/gx/`).
- `split`: time-based train / validation / test split (DATA_CONTRACT.md) -> `split/*.parquet`,
  `split/split.json`.
- `build_features`: PySpark daily user and item feature snapshots (each valid from the end of its
  UTC day, built only from earlier events) into the long-lived offline store
  `$RECSYS_HOME/feature_store/offline/` (a run rewrites its own day partitions).
- `feast_apply`: registers `feature_repo/` (entities, views, services `ranker_v1`, `two_tower_v1`).
- `materialize`: loads the newest snapshot values into the online store (SQLite, or Redis in production).
- `training_set`: Feast point-in-time retrieval for every train/validation interaction plus the
  request-time context features -> `training_set/training_set.parquet`.
- `drift_check`: Evidently PSI of the newest window vs the training window (event mix, popularity,
  hour, value, activity, feature rates) -> `drift_check/drift_report.html` and `.json`; PSI above
  `drift_threshold` warns, or fails the run before any model is trained when `drift_mode` is `fail`.
- `train_two_tower`: PyTorch two-tower retrieval model (and the team's MF beside it): hyper-parameters
  chosen on the validation window, refit on train + validation, scored on the test window with 95 %
  bootstrap CIs; params, learning curves, metrics and the model logged to MLflow
  (`$RECSYS_HOME/mlflow`) -> `train_two_tower/model/`, `metrics.json`.
- `build_index`: FAISS index of the whole catalog (Flat when small, IVF/HNSW when large) tuned to
  recall@k >= target vs exact search on held-out users; written with checksums as version 1 of
  the serving fit's catalog, staged for the bundle -> `build_index/index/`, `build_index/index.json`.
- `candidates`: item-to-item (co-occurrence) and content graphs of the three fits (validation, protocol,
  serving), Feast point-in-time features at each cut, and the pool's fusion (weights, trending window) chosen on
  validation pool recall@N -> `candidates/fits/`, `candidates/candidates.json`.
- `ranking_set`: one query per user at `t_val` (validation fit's pool, labels graded from the validation window)
  and at `t_test` (protocol fit's pool, test-window labels) -> `ranking_set/{validation,test}.parquet`.
- `tune_ranker`: Optuna study (TPE, LightGBM pruning) of the lambdarank ranker on a by-user holdout; resumes from
  `$RECSYS_HOME/optuna/` on retry -> `tune_ranker/study.json`, `plots/*.html`; MLflow.
- `train_ranker`: protocol ranker (validation queries) and serving ranker (test queries) with the best params.
- `evaluate`: the protocol fit on the test window vs popularity, recent popularity, two-tower alone, the merged
  pool, two-stage (+ rules) and the champion (paired) -> `evaluate/report.html`, `report.json`; MLflow.
- `register`: the bundle (towers, index + checksums, ranker, feature service, config, metrics, data hash, code)
  as a new version of the MLflow model `recsys_<namespace>`; the gate decides `champion` / `challenger`; a
  failed gate fails this task, registers the version as failed and leaves the aliases untouched.
- `build_bento`: `bentoml build` of that version (service, bundle, serving snapshot) as the Bento
  `<model>:v<version>`, labelled with the run; the tag is recorded on the model version in MLflow.

The params are resolved once by `ingest` (defaults, then `RECSYS_*` settings, then the run's params) into the
run's `manifest.json`; every later task reads them from there.

**Params**: `source`, `synthetic` (generator settings, `faults`), `as_of` (ISO-8601; empty = contract default),
`t_val`/`t_test` (explicit split boundaries), `quality_threshold`, `max_stub_share`, `horizon_days`,
`bot_events_per_day`, `drift_mode` (warn | fail), `drift_threshold` (PSI, default 0.2), `two_tower` (grid,
epochs, content method, `grid_budget_s`, `serving_fit`), `index` (kind, target_recall, k), `candidates` (pool_size,
weights, trending_days, ...), `ranker` (n_trials, timeout_s, ...), `gate` (metrics, tolerance).

**Extending**: write a function in `pipeline_tasks/<package>/<module>.py` that takes `out_dir` and returns a
small dict, add a one-line stage in `pipeline_tasks/stages/<package>.py`, and wire a task here (with `@fail_fast`)
that calls it with its upstream task's output. Errors deriving from `PermanentError` (bad data, failed gates,
invalid params, checksum mismatches) fail the task at once; anything else is retried twice. Every task has an
`execution_timeout` (1 h, 4 h for the heavy ones).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, TaskGroup, dag, task
from recsys_common import CHALLENGER_ASSET, RETRY_ARGS, fail_fast

from pipeline_tasks.core.constants import DEFAULT_PARAMS  # a plain dict: no heavy import at parse time

LONG = timedelta(hours=4)  # Spark features, point-in-time reads, training: minutes to hours at real sizes

PARAMS = {
    "source": Param(DEFAULT_PARAMS["source"], type="string",
                    description="synthetic | movielens:PATH | a directory with the contract tables"),
    "synthetic": Param(
        DEFAULT_PARAMS["synthetic"], type="object",
        description="generator settings when source=synthetic; faults: 'all', 'none' or {'rate': 0.004}",
    ),
    "as_of": Param(None, type=["null", "string"], description="ISO-8601 moment the run looks from; empty = default"),
    "t_val": Param(None, type=["null", "string"], description="explicit validation boundary (with t_test)"),
    "t_test": Param(None, type=["null", "string"], description="explicit test boundary (with t_val)"),
    "quality_threshold": Param(None, type=["null", "number"], minimum=0, maximum=1,
                               description="minimum accepted share of interactions (default 0.95)"),
    "max_stub_share": Param(DEFAULT_PARAMS["max_stub_share"], type=["null", "number"], minimum=0, maximum=1,
                            description="largest share of accepted interactions whose item (or user) is missing "
                                        "from its table and gets a stub row; above it the gate fails (default 0.05, "
                                        "RECSYS_MAX_STUB_SHARE)"),
    "horizon_days": Param(None, type=["null", "integer"], minimum=1, description="oldest allowed event age"),
    "feedback_log": Param(None, type=["null", "string"],
                          description="a service's feedback log directory (RECSYS_HOME/feedback/<namespace>): its "
                                      "events of contract types join the source's interactions"),
    "bot_events_per_day": Param(None, type=["null", "integer"], minimum=1,
                                description="events per user per UTC day above which that day is a bot's"),
    "drift_mode": Param(DEFAULT_PARAMS["drift_mode"], enum=["warn", "fail"],
                        description="on PSI above drift_threshold: warn in the log, or fail the run"),
    "drift_threshold": Param(DEFAULT_PARAMS["drift_threshold"], type="number", exclusiveMinimum=0,
                             description="PSI above which a monitored feature counts as drifted"),
    "two_tower": Param(DEFAULT_PARAMS["two_tower"], type="object",
                       description="retrieval training overrides, e.g. {'base': {'max_epochs': 10}, "
                                   "'grid': [{'id_dropout': 0.2}], 'content_method': 'minilm'}"),
    "index": Param(DEFAULT_PARAMS["index"], type="object",
                   description="FAISS index overrides, e.g. {'kind': 'hnsw', 'target_recall': 0.95, 'k': 100}"),
    "candidates": Param(DEFAULT_PARAMS["candidates"], type="object",
                        description="candidate pool overrides, e.g. {'pool_size': 500, 'trending_days': 7, "
                                    "'weights': {'two_tower': 1, 'i2i': 1}} (weights and trending window are "
                                    "otherwise chosen on validation)"),
    "ranker": Param(DEFAULT_PARAMS["ranker"], type="object",
                    description="LightGBM lambdarank / Optuna overrides, e.g. {'n_trials': 20, 'timeout_s': 300, "
                                "'holdout_share': 0.2, 'max_rounds': 500}"),
    "gate": Param(DEFAULT_PARAMS["gate"], type="object",
                  description="registry gate, e.g. {'metrics': ['ndcg@10', 'pool_recall'], 'tolerance': 0.01} "
                              "(challenger minus champion, paired, must be >= -tolerance)"),
}


@dag(
    dag_id="recsys_training",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=RETRY_ARGS,
    params=PARAMS,
    tags=["recsys", "training"],
    doc_md=__doc__,
)
def recsys_training() -> None:
    @task(doc_md="Read the data source into the canonical contract tables (nothing dropped).")
    @fail_fast
    def ingest(params: dict | None = None, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.data import ingest_stage

        return ingest_stage(run_id, params)

    @task(doc_md="Validate with Great Expectations, quarantine bad rows with reasons, apply the quality gate.")
    @fail_fast
    def validate(ingested: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.data import validate_stage

        return validate_stage(run_id, ingested)

    @task(doc_md="Time-based train / validation / test split of the accepted interactions.")
    @fail_fast
    def split(validated: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.data import split_stage

        return split_stage(run_id, validated)

    @task(doc_md="PySpark daily user/item feature snapshots into the offline store (serialised writers).",
          execution_timeout=LONG)
    @fail_fast
    def build_features(validated: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.features import build_features_stage

        return build_features_stage(run_id, validated)

    @task(doc_md="`feast apply` of feature_repo/: entities, feature views, feature services.")
    @fail_fast
    def feast_apply(features: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.features import feast_apply_stage

        return feast_apply_stage(run_id)

    @task(doc_md="Incremental materialization of the newest snapshot into the online store.", execution_timeout=LONG)
    @fail_fast
    def materialize(features: dict, applied: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.features import materialize_stage

        return materialize_stage(run_id, features)

    @task(doc_md="Point-in-time training set (Feast historical retrieval) plus request-time context features.",
          execution_timeout=LONG)
    @fail_fast
    def training_set(split_out: dict, materialized: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.features import training_set_stage

        return training_set_stage(run_id, split_out)

    @task(doc_md="Evidently PSI drift check of the newest window vs the reference, before any model is trained; "
                 "in `fail` mode a drifted window stops the run here.")
    @fail_fast
    def drift_check(validated: dict, split_out: dict, features: dict, materialized: dict,
                    run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.evaluation import drift_check_stage

        return drift_check_stage(run_id, validated, split_out, features)

    @task(doc_md="PyTorch two-tower (and MF) retrieval: tune on validation, refit, score on test; log to MLflow.",
          execution_timeout=LONG)
    @fail_fast
    def train_two_tower(validated: dict, split_out: dict, train_set: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.retrieval import train_two_tower_stage

        return train_two_tower_stage(run_id, validated, split_out, train_set)

    @task(doc_md=("FAISS index of the catalog tuned to the recall target, staged as a checksummed version: `register` "
                  "puts it into the bundle; only the registry's aliases decide what is served."),
          execution_timeout=LONG)
    @fail_fast
    def build_index(trained: dict, features: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.retrieval import build_index_stage

        return build_index_stage(run_id, trained, features)

    @task(doc_md="Item graphs of the validation, protocol and serving fits, Feast features at each cut, and the "
                 "candidate fusion chosen on validation pool recall@N.", execution_timeout=LONG)
    @fail_fast
    def candidates(validated: dict, split_out: dict, trained: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.ranking import candidates_stage

        return candidates_stage(run_id, validated, split_out, trained)

    @task(doc_md="Ranking sets: one query per user at t_val (validation fit) and t_test (protocol fit), "
                 "feature rows by the shared assembly, graded labels from the next window.", execution_timeout=LONG)
    @fail_fast
    def ranking_set(cands: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.ranking import ranking_set_stage

        return ranking_set_stage(run_id, cands)

    @task(doc_md="Optuna study (TPE, pruning) of the LightGBM lambdarank ranker on a by-user holdout of the "
                 "validation queries; resumes on retry; plots and best params to MLflow.", execution_timeout=LONG)
    @fail_fast
    def tune_ranker(rsets: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.ranking import tune_ranker_stage

        return tune_ranker_stage(run_id, rsets)

    @task(doc_md="Protocol ranker (validation queries) and serving ranker (test queries) with the best params.",
          execution_timeout=LONG)
    @fail_fast
    def train_ranker(cands: dict, rsets: dict, tuned: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.ranking import train_ranker_stage

        return train_ranker_stage(run_id, cands, rsets, tuned)

    @task(doc_md="Two-stage evaluation on the test window vs baselines and the champion -> evaluate/report.html.",
          execution_timeout=LONG)
    @fail_fast
    def evaluate(cands: dict, ranker: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.bundle import evaluate_stage

        return evaluate_stage(run_id, cands, ranker)

    @task(doc_md="Register the bundle as a new MLflow model version; the gate moves champion/challenger or "
                 "fails here leaving the aliases untouched. Updates the Asset `recsys_challenger`, which starts "
                 "`recsys_canary` where a scheduler runs.", outlets=[CHALLENGER_ASSET])
    @fail_fast
    def register(cands: dict, ranker: dict, index: dict, evaluated: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.bundle import register_stage

        return register_stage(run_id, cands, ranker, index, evaluated)

    @task(doc_md="`bentoml build` of the registered bundle version: service, bundle and serving snapshot in one "
                 "Bento tagged `<model>:v<version>` (one per run); the tag is recorded on the MLflow model version. "
                 "Serve it with `bentoml serve <tag>` or `recsys serve --model-version <version>`.",
          execution_timeout=LONG)
    @fail_fast
    def build_bento(registered: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.bundle import build_bento_stage

        return build_bento_stage(run_id, registered)

    # Groups only draw the stages in the UI (prefix_group_id=False): task ids stay what the docs and CLI say.
    with TaskGroup("data", prefix_group_id=False, tooltip="ingest, validate, split"):
        validated = validate(ingest())
        split_out = split(validated)
    with TaskGroup("features", prefix_group_id=False, tooltip="Spark snapshots, Feast, training set, drift"):
        features = build_features(validated)
        split_out >> features
        materialized = materialize(features, feast_apply(features))
        train_set = training_set(split_out, materialized)
        drifted = drift_check(validated, split_out, features, materialized)
    with TaskGroup("retrieval", prefix_group_id=False, tooltip="two-tower retrieval and its FAISS index"):
        trained = train_two_tower(validated, split_out, train_set)
        drifted >> trained  # a drifted window (drift_mode=fail) stops the run before a model is trained
        index = build_index(trained, features)
    with TaskGroup("ranking", prefix_group_id=False, tooltip="candidate pools, ranking sets, Optuna, LightGBM"):
        cands = candidates(validated, split_out, trained)
        rsets = ranking_set(cands)
        ranker = train_ranker(cands, rsets, tune_ranker(rsets))
    with TaskGroup("release", prefix_group_id=False,
                   tooltip="evaluation against the champion, registry and gate, the run's Bento"):
        evaluated = evaluate(cands, ranker)
        build_bento(register(cands, ranker, index, evaluated))

recsys_training()
