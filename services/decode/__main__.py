from services.decode.main import main

# Guarded: the vLLM backend starts processes that re-import the main module.
if __name__ == "__main__":
    main()
