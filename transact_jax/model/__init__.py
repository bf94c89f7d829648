"""TransAct V2 model: feature encoding, encoder, ranking tower, losses (knows nothing of training)."""
