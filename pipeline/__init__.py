"""The data path of stylegen: config, sources, plan, Ray Data stages, sink and the run driver."""

from pipeline.redact import install_log_redaction

# Every process that runs stylegen code (the driver, each Ray worker, a submitted job) imports this package first:
# from then on no log line it writes carries a URL credential or a secret env var value.
install_log_redaction()
