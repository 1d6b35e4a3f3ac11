"""Model providers: one module per wire format, behind :class:`~services.integrator.llm.base.ModelProvider`."""
