"""Sequential retrieval in the traditional setting of "Generative Recommenders" (§4.1.1, Table 4):
per-user item sequences with a leave-one-out split (``data``), SASRec and HSTU user encoders
(``models``), sampled-softmax training and HR@K / NDCG@K over the entire corpus (``train``)."""
