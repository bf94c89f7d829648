def rand_w(key, n=2, d=64, f=32):
    ks = jax.random.split(key, 12)
    shp = dict(w_qkv=(n,d,3*d), b_qkv=(n,3*d), w_o=(n,d,d), b_o=(n,d), ln1_scale=(n,d), ln1_bias=(n,d), w_1=(n,d,f), b_1=(n,f), w_2=(n,f,d), b_2=(n,d), ln2_scale=(n,d), ln2_bias=(n,d))
    out = {}
    for k_, (name, s) in zip(ks, shp.items()):
        sc = 1/np.sqrt(s[1]) if name.startswith("w") else 0.1
        out[name] = jax.random.normal(k_, s) * sc + (1.0 if "scale" in name else 0)
    return EncoderWeights(**out)
