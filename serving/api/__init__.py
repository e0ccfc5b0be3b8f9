"""The OpenAI wire surface: request models, response rendering, errors."""
