"""The method: transports, the TiM target and loss, the any-step sampler.

It knows nothing of models, trainer or inference."""
