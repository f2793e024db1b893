"""The paper's networks as pyro-bc model/guide definitions (one file each, ``build(prior, **options)``)."""
