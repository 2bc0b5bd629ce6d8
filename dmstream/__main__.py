from dmstream.cli import main

main()
