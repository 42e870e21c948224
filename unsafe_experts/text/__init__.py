"""Text in and out of a model: chat rendering, tokenised examples, generation (local or
through a server), refusal detection."""
