"""Layer 2, the method (METHOD.md): VP schedule, prediction types, step maps Phi_t, guidance
terms and the gradient combiners (sum, dependent = Algorithm 1, cagrad = Algorithm 2).

Plain tensor maths over the contracts; no files, no plugins, no models.
"""
