"""HTTP routes by API family: ``openai`` (models, chat and text completions), ``interactive``
(LMDeploy's session route), ``ops`` (tokenize, health, metrics), sharing ``common``."""
