"""What a MoE model is to the engine: each architecture's record (router, experts, reselection,
tiny config), router masks and steering, tiny models, devices and sharding."""
