# The guard matters: vLLM spawns its engine core in a child process that re-imports __main__.
if __name__ == "__main__":
    from consumer.cli import main

    main()
