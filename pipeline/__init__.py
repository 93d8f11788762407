"""The data path of stylegen: config, sources, plan, Ray Data stages, sink and the run driver."""
