from cspexp.cli import main

main()
