from medcfx.cli import main

main()
