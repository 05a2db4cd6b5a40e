"""The only code that imports verl, vLLM, Ray or TransferQueue: one folder per framework, so an upgrade of either
touches its folder (and ``respec_plugin.compat``) only."""
