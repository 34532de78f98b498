"""SageMaker training jobs for nxd-lora: the request (``spec``), submission and following
(``submit``), the in-container entry point (``entry``) and the command line (``command``)."""
