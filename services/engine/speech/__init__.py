"""The built-in speech model `speech-ssl`: a synthesized corpus (corpus), the encoder (model) and
its training (train). Imported only inside a job's child process (torch)."""
