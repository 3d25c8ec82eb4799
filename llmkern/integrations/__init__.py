"""Drop-in glue for Hugging Face transformers and PEFT."""
