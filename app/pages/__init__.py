"""One module per page: ``NAME``, ``PATH``, ``TITLE``, ``layout(ctx, params)``, ``register(app, ctx)``."""
