"""What a run is: its config (the schema and its checks), its run directory, its data and its machine. No stage here, and no Hydra."""
