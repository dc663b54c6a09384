"""Policy apart from mechanics: which rows a method keeps (``methods``, from ``scoring``)
and how an average budget is split over layers (``budgets``)."""
