"""The SparkSession the feature jobs run on: any master URL, UTC, quiet, small shuffles.

``local[*]`` is the embedded default; a production profile points ``RECSYS_SPARK_MASTER`` at a
standalone, YARN or Kubernetes master. Only task bodies import this module.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pyspark import SparkContext
from pyspark.sql import SparkSession

from pipeline_tasks.core.settings import Settings, load_settings

log = logging.getLogger(__name__)

DEFAULT_DRIVER_MEMORY = "2g"
DEFAULT_SHUFFLE_PARTITIONS = 8
JAVA_UTC = "-Duser.timezone=UTC"

# Runtime SQL settings: applied at creation and again to an existing session (getOrCreate).
SQL_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.shuffle.partitions": str(DEFAULT_SHUFFLE_PARTITIONS),
    # A re-run of a job replaces only the partitions (days) it writes.
    "spark.sql.sources.partitionOverwriteMode": "dynamic",
    # parquet TIMESTAMP(MICROS, UTC) rather than the legacy INT96: pyarrow reads timestamp[us, tz=UTC].
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    # pandas writes the contract tables with nanosecond timestamps, which Spark cannot read as
    # timestamps: they are read as epoch nanoseconds (long) and converted by the jobs.
    "spark.sql.legacy.parquet.nanosAsLong": "true",
}


def _private_spark_home() -> str:
    """A throw-away SPARK_HOME linking pip's pyspark package (its ``jars/``, ``bin/``, ``conf/``).

    ``local-cluster`` workers launch executors from ``$SPARK_HOME`` and write their work
    directories under ``$SPARK_HOME/work``; a private home keeps those out of the virtualenv.
    """
    import pyspark

    package = Path(pyspark.__file__).resolve().parent
    home = Path(tempfile.mkdtemp(prefix="recsys-spark-home-"))
    for entry in package.iterdir():
        if entry.name not in ("work", "__pycache__"):
            (home / entry.name).symlink_to(entry)
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return str(home)


def get_spark(
    settings: Settings | None = None,
    master: str | None = None,
    app_name: str = "recsys",
    conf: dict[str, str] | None = None,
) -> SparkSession:
    """Get (or create) the SparkSession for the pipeline's jobs.

    Args:
        settings: where the master URL comes from (``settings.spark_master``, env
            ``RECSYS_SPARK_MASTER``); loaded from the environment when omitted.
        master: an explicit master URL (``local[*]``, ``local-cluster[2,1,1024]``,
            ``spark://host:7077``, ``yarn``, ``k8s://...``); overrides the settings.
        app_name: the application name shown by the cluster manager.
        conf: extra Spark settings, applied last (e.g. ``spark.driver.memory``).

    Returns:
        The session; an existing one is reused (one SparkContext per JVM) and gets the runtime
        SQL settings above, while its master and JVM settings stay as they were.
    """
    master = master or (settings or load_settings()).spark_master
    if SparkContext._active_spark_context is None:  # no JVM-side context yet in this process
        if master.startswith("local"):
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no hostname lookups on a laptop
        if master.startswith("local-cluster") and "SPARK_HOME" not in os.environ:
            os.environ["SPARK_HOME"] = _private_spark_home()
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = (
            SparkSession.builder.master(master)
            .appName(app_name)
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.driver.memory", DEFAULT_DRIVER_MEMORY)
            .config("spark.driver.extraJavaOptions", JAVA_UTC)
            .config("spark.executor.extraJavaOptions", JAVA_UTC)
        )
        for key, value in {**SQL_CONF, **(conf or {})}.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
        log.info("Spark %s started: master=%s app=%s", spark.version, spark.sparkContext.master, app_name)
    else:
        spark = SparkSession.builder.getOrCreate()
        if spark.sparkContext.master != master:
            log.warning("reusing the running SparkSession (master %s), not %s: one SparkContext per process",
                        spark.sparkContext.master, master)
    for key, value in SQL_CONF.items():
        spark.conf.set(key, value)
    for key, value in (conf or {}).items():
        if key.startswith("spark.sql."):
            spark.conf.set(key, value)
    return spark
