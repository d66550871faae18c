"""The LBM model: config, construction, checkpoint IO, exact base, sampler, imaging."""
